"""Batch scoring on Spark: the counts of a whole set of bin photos, one row per photo, with the registered model
as a Spark UDF (`mlflow.pyfunc.spark_udf`), the same job in local mode and on a cluster.

Input (`list_photos`, on the driver, before any Spark work): a local folder, an S3 prefix, or a manifest
(`runs:/<ingest run>/manifest.csv` or a file). The driver lists the photos; the executors read them: S3 objects
with the project's boto3 code (sources.S3Source: retries; anonymous like ingest, signed when the prefix refuses
anonymous reads and credentials exist), files from their paths. (Spark's binaryFile source is not used for
folders: it drops 0-byte files, so rows out would not equal photos in, and reads `?*[{` in names as patterns.)
Each photo is checked with the one decoder (transforms.decode_image) as it is read; one that cannot be read or
decoded gets its `error` and the model sees a placeholder image in its place (the pyfunc refuses a batch with no
readable image, and one bad photo must not sink a partition); its count stays null.

The model runs as spark_udf(env_manager="local"): Arrow batches of `batch_size` photos per model call (the
pyfunc answers through predict.predict, the one prediction path: it decodes a batch in threads and runs forwards
of counters.MAX_BATCH). On a cluster the model is loaded once per Python worker (MLflow's SparkModelCache; workers
are reused across tasks); in local mode MLflow loads it once per partition, so `partitions` defaults to one per
core. The session and the output folder are spark_job's.

Output (a folder, spark_job.OutputFolder): `scores.parquet/` (and `scores.csv/` when asked) with image_id,
source, count, confidence, p_<c>, review (when the model has it), error, and with the inventory check
expected_quantity, p_expected, flagged, status, and `recounts.csv`, the recount sheet of the flagged bins
(bincounter.recounts); `score.json` (what ran, the row counts) marks it as a score output. It is written beside
the old one and swapped in: a rerun replaces the output as a whole, never a mix of two runs.
"""
from __future__ import annotations

import io
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import boto3
import mlflow
import pandas as pd
from botocore.exceptions import BotoCoreError, ClientError
from PIL import Image

from bincounter import abid, recounts
from bincounter import reconcile as rec
from bincounter.layouts import PHOTO_SUFFIXES
from bincounter.manifest import read_manifest
from bincounter.predict import find_images, read_file
from bincounter.report import RECOUNTS
from bincounter.runs import load_pyfunc, local_file
from bincounter.sources import MissingObject, S3Source, SourceError, anonymous_client, signed_client
from bincounter.spark_job import MARKER, OutputFolder
from bincounter.transforms import ImageError, decode_image

TABLE = "scores.parquet"
CSV = "scores.csv"
READ_THREADS = 16  # objects fetched and checked at once per Python worker: S3 reads wait on the network


@dataclass
class Photos:
    """What to score: `rows` (image_id, source: a local path or s3:// URI) and whether S3 is read with
    credentials (`signed`)."""
    input: str
    rows: pd.DataFrame
    signed: bool = False


def list_photos(input: str, limit: int = 0) -> Photos:
    """`input` (folder, s3:// prefix or manifest) -> the photos to score, the first `limit` (0 = all) in the
    order listed (file names, keys, manifest rows). ValueError naming `input` when it matches no photo or
    cannot be listed."""
    if limit < 0:
        raise ValueError(f"limit must be 0 (all) or more, got {limit}")
    signed = False
    if input.startswith("s3://"):
        keys, signed = _list_s3(input, limit)
        bucket = urlparse(input).netloc
        rows = pd.DataFrame({"image_id": [Path(k).stem for k in keys], "source": [f"s3://{bucket}/{k}" for k in keys]})
    elif input.startswith("runs:/") or input.endswith(".csv"):
        try:
            with local_file(input) as path:
                m = read_manifest(path)
        except (OSError, mlflow.exceptions.MlflowException) as e:
            raise ValueError(f"input {input}: cannot read the manifest ({e})") from None
        rows = pd.DataFrame({"image_id": m["image_id"], "source": [str(Path(p).resolve()) for p in m["path"]]})
    elif Path(input).is_dir():
        paths = [p.resolve() for p in find_images([input])]
        rows = pd.DataFrame({"image_id": [p.stem for p in paths], "source": [str(p) for p in paths]})
    else:
        raise ValueError(f"input {input}: not a folder, an s3:// prefix or a manifest (a .csv file or "
                         "runs:/<ingest run>/manifest.csv)")
    if limit:
        rows = rows.head(limit)
    if rows.empty:
        raise ValueError(f"input {input}: no photos there (.jpg, .jpeg or .png)")
    return Photos(input, rows.reset_index(drop=True), signed)


def _split_s3(uri: str) -> tuple[str, str]:
    u = urlparse(uri)
    return u.netloc, u.path.lstrip("/")


def _client(signed: bool, workers: int = READ_THREADS):
    """An S3 client: anonymous (ingest's), or signed with the credentials boto3 finds; both retry."""
    return (signed_client if signed else anonymous_client)(None, workers)


def _list_s3(uri: str, limit: int) -> tuple[list[str], bool]:
    """The image keys under an s3:// prefix (the first `limit`), and whether reading them needs credentials."""
    bucket, prefix = _split_s3(uri)
    if not bucket:
        raise ValueError(f"input {uri}: no bucket in the S3 URI (s3://<bucket>/<prefix>)")
    for signed in (False, True):
        keys: list[str] = []
        try:
            for page in _client(signed).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                keys += [o["Key"] for o in page.get("Contents", []) if Path(o["Key"]).suffix.lower() in PHOTO_SUFFIXES]
                if limit and len(keys) >= limit:
                    break
            return keys, signed
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket":
                raise ValueError(f"input {uri}: there is no bucket {bucket!r}") from None
            if code not in ("AccessDenied", "403"):
                raise ValueError(f"input {uri}: cannot list it ({code or e})") from None
            if signed:
                raise ValueError(f"input {uri}: not readable with the AWS credentials found") from None
            if not boto3.session.Session().get_credentials():
                raise ValueError(f"input {uri}: not readable anonymously, and there are no AWS credentials") from None
            # a private bucket: list and read it with the credentials boto3 finds
        except BotoCoreError as e:
            raise ValueError(f"input {uri}: cannot reach S3 ({e})") from None


@dataclass
class Model:
    """A model to score with: its URI, its output columns as (name, Spark type), and its own threshold for the
    inventory check (chosen on validation; `bincounter reconcile`'s default too)."""
    uri: str
    columns: list[tuple[str, str]]
    check_threshold: float


def check_model(model_uri: str) -> Model:
    """Load the model on the driver (a URI that does not load fails here, not in every task) -> Model."""
    try:
        model = load_pyfunc(model_uri)
    except Exception as e:  # noqa: BLE001 - MLflow, the network or the model's own code: all mean "does not load"
        raise ValueError(f"model_uri {model_uri}: does not load ({type(e).__name__}: {e})") from None
    signature = model.metadata.signature
    if signature is None or signature.outputs is None:
        raise ValueError(f"model_uri {model_uri}: has no output signature: log it with bincounter.serving.log_model")
    columns = [(c.name, c.type.to_spark().simpleString()) for c in signature.outputs.inputs]
    counter = getattr(model.unwrap_python_model(), "counter", None)
    if counter is None:
        raise ValueError(f"model_uri {model_uri}: not a bin counter (log it with bincounter.serving.log_model)")
    return Model(model_uri, columns, counter.trust.check_threshold)


_SPARK_TYPES = {"long": "long", "integer": "long", "bigint": "long", "double": "double", "float": "double",
                "boolean": "boolean", "string": "string"}


def result_type(columns: list[tuple[str, str]]) -> str:
    """The model's output columns -> spark_udf's struct type. Whole numbers travel as double and are cast back:
    MLflow casts a struct's long fields with numpy, which has no null for a bad image's count."""
    fields = []
    for name, t in columns:
        t = _SPARK_TYPES.get(t, "string")
        fields.append(f"`{name}`:{'double' if t == 'long' else t}")
    return f"struct<{','.join(fields)}>"


def _placeholder() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, "JPEG")
    return buf.getvalue()


PLACEHOLDER = _placeholder()  # what the model sees in place of a photo that cannot be scored
_SOURCES: dict[tuple[str, bool], S3Source] = {}  # per Python worker, kept across tasks: one client per bucket
_SOURCES_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None


def _s3(bucket: str, signed: bool) -> S3Source:
    with _SOURCES_LOCK:
        if (bucket, signed) not in _SOURCES:  # its endpoint: AWS_ENDPOINT_URL, else AWS
            _SOURCES[(bucket, signed)] = S3Source(bucket, workers=READ_THREADS, signed=signed)
        return _SOURCES[(bucket, signed)]


def read_photo(source: str, signed: bool = False) -> tuple[bytes, str | None]:
    """One photo (a path or s3:// URI) -> (its bytes, None) when they decode, else (PLACEHOLDER, why it cannot
    be scored, naming `source`)."""
    try:
        if source.startswith("s3://"):
            bucket, key = _split_s3(source)
            content = _s3(bucket, signed).get(key)  # S3Source's retries and error messages
        else:
            content, error = read_file(source)
            if error:
                return PLACEHOLDER, error
        decode_image(content, source)
        return content, None
    except (ImageError, MissingObject, SourceError) as e:
        return PLACEHOLDER, str(e)


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="bincounter-read")
    return _POOL


def read_photos(sources: pd.Series, signed: bool = False) -> pd.DataFrame:
    """A batch of photos -> content, error (read_photo's), READ_THREADS at a time (S3 reads wait on the
    network; PIL decodes without the GIL)."""
    out = list(_pool().map(lambda s: read_photo(s, signed), sources))
    return pd.DataFrame(out, columns=["content", "error"])


def photo_frame(spark, photos: Photos, partitions: int = 0):
    """-> a DataFrame image_id, source in `partitions` partitions (0: Spark's default parallelism, one per
    core), for the executors to read."""
    n = partitions or spark.sparkContext.defaultParallelism
    return spark.createDataFrame(photos.rows[["image_id", "source"]], "image_id string, source string").repartition(n)


def count_frame(spark, df, model: Model, signed: bool = False):
    """Photos (photo_frame) -> image_id, source, the model's columns (count, confidence, p_<c>, ...; null where
    the photo cannot be scored) and error."""
    from pyspark.sql import functions as F

    def read(sources: pd.Series) -> pd.DataFrame:
        return read_photos(sources, signed)

    read_udf = F.pandas_udf(read, "struct<content:binary,error:string>")
    udf = mlflow.pyfunc.spark_udf(spark, model.uri, env_manager="local", result_type=result_type(model.columns))
    df = df.withColumn("_in", read_udf("source"))
    df = df.withColumn("_out", udf(F.col("_in.content")))
    ok = F.col("_in.error").isNull()
    out = [F.col("image_id"), F.col("source")]
    model_error = F.lit(None).cast("string")
    for name, t in model.columns:
        value = F.col(f"_out.`{name}`")
        if name == "error":
            # MLflow casts a struct's string fields with astype(str): a good row's null arrives as "None" or
            # "<NA>". The pyfunc's contract says which rows have an error: those without a count.
            model_error = F.when(F.col("_out.count").isNull() | F.isnan("_out.count"), value)
        else:
            out.append(F.when(ok, value.cast("long") if _SPARK_TYPES.get(t) == "long" else value).alias(name))
    return df.select(*out, F.coalesce(F.col("_in.error"), model_error).alias("error"))


@dataclass
class Expected:
    """The inventory check's expected quantities: read on the driver from a metadata folder or CSV
    (reconcile.read_expected: `quantities`, `problems`), or, for an s3:// metadata prefix (`prefix`), read per
    photo in the executors with the same rule (abid.parse_metadata)."""
    source: str
    threshold: float
    quantities: dict[str, int] | None = None
    problems: dict[str, str] | None = None
    prefix: str | None = None


def expectations(source: str, threshold: float) -> Expected:
    """`expected` (a metadata folder, a CSV image_id,expected_quantity or an s3:// metadata prefix) and the
    check's threshold -> Expected: a folder or CSV read now (reconcile.read_expected, the one reader), a prefix
    later, per photo. ValueError naming it when it cannot be read."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    if source.startswith("s3://"):
        return Expected(source, threshold, prefix=source if source.endswith("/") else source + "/")
    try:
        quantities, problems = rec.read_expected(source)
    except (OSError, ValueError) as e:
        raise ValueError(f"expected {source}: {e}") from None
    return Expected(source, threshold, quantities, problems)


def read_metadata(prefix: str, image_id: str, signed: bool = False) -> tuple[int | None, str | None]:
    """A photo's metadata under an s3:// prefix -> (its expected quantity, None), (None, why it is unusable), or
    (None, None) when there is none (like a folder without the file)."""
    bucket, key = _split_s3(f"{prefix}{image_id}.json")
    try:
        return abid.parse_metadata(_s3(bucket, signed).get(key), f"s3://{bucket}/{key}"), None
    except MissingObject:
        return None, None
    except (SourceError, abid.MetadataError) as e:
        return None, str(e)


def check_frame(spark, df, expected: Expected, signed: bool = False):
    """Counted photos (count_frame) -> the same with reconcile's per-bin columns expected_quantity, p_expected,
    flagged, status: reconcile.check applied to each Arrow batch with the expectations of its photos."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import BooleanType, DoubleType, LongType, StringType, StructField, StructType

    if expected.prefix is None:
        ids = sorted(set(expected.quantities) | set(expected.problems))
        table = pd.DataFrame({"image_id": pd.Series(ids, dtype=object),
                              "_expected": pd.array([expected.quantities.get(i) for i in ids], dtype="Int64"),
                              "_problem": pd.Series([expected.problems.get(i) for i in ids], dtype=object)})
        schema = "image_id string, _expected long, _problem string"
        df = df.join(F.broadcast(spark.createDataFrame(table, schema)), "image_id", "left")
    else:
        def fetch(image_ids: pd.Series) -> pd.DataFrame:
            found = list(_pool().map(lambda i: read_metadata(expected.prefix, i, signed), image_ids))
            return pd.DataFrame({"_expected": pd.array([q for q, _ in found], dtype="Int64"),
                                 "_problem": [p for _, p in found]})

        meta = F.pandas_udf(fetch, "struct<_expected:long,_problem:string>")("image_id")
        df = df.withColumn("_meta", meta).select("*", "_meta._expected", "_meta._problem").drop("_meta")
    columns = [c for c in df.columns if c not in ("_expected", "_problem")]
    added = [StructField("expected_quantity", LongType()), StructField("p_expected", DoubleType()),
             StructField("flagged", BooleanType()), StructField("status", StringType())]
    schema = StructType([f for f in df.schema.fields if f.name in columns] + added)
    threshold = expected.threshold

    def check(batches):
        for pdf in batches:
            has = pdf["_expected"].notna()
            quantities = dict(zip(pdf["image_id"][has], pdf["_expected"][has].astype(int)))
            bad = pdf["_problem"].notna()
            problems = dict(zip(pdf["image_id"][bad], pdf["_problem"][bad]))
            rows = pdf[columns].reset_index(drop=True)
            checked = rec.check(rows.rename(columns={"source": "path"}), quantities, problems, threshold)
            # this batch's photos, in its order (check adds no other bins: it was given only theirs)
            checked = checked.set_index("image_id").loc[rows["image_id"]].reset_index(drop=True)
            yield rows.assign(**{f.name: checked[f.name] for f in added})

    return df.mapInPandas(check, schema)


def score(spark, photos: Photos, model: Model, output: str, partitions: int = 0, csv: bool = False,
          expected: Expected | None = None) -> dict:
    """Count `photos` with the model (and check them against `expected`) and write the output folder, replacing
    a previous score output there. -> figures: images, rows, scored, unreadable, seconds (the Spark job),
    images_per_s, partitions, output; with `expected` also `flagged` and `check`, reconcile.summary's figures."""
    if expected is not None and photos.rows["image_id"].duplicated().any():
        dup = photos.rows[photos.rows["image_id"].duplicated(keep=False)]
        raise ValueError(f"input {photos.input}: two photos of bin {dup['image_id'].iloc[0]}: "
                         f"{' and '.join(dup['source'].head(2))} (the inventory check needs one per bin)")
    target = OutputFolder(spark, output)
    target.check()
    new = OutputFolder(spark, f"{target.path.toString()}.tmp-{uuid.uuid4().hex[:8]}")
    frame = photo_frame(spark, photos, partitions)
    n_partitions = frame.rdd.getNumPartitions()
    try:
        start = time.perf_counter()
        out = count_frame(spark, frame, model, photos.signed)
        if expected is not None:
            out = check_frame(spark, out, expected, photos.signed)
        out.write.parquet(new.child(TABLE))
        seconds = time.perf_counter() - start
        table = spark.read.parquet(new.child(TABLE))
        if csv:
            table.write.option("header", "true").csv(new.child(CSV))
        rows = table.count()
        unreadable = table.where("error IS NOT NULL").count()
        stats = {"images": len(photos.rows), "rows": rows, "scored": rows - unreadable, "unreadable": unreadable,
                 "seconds": round(seconds, 3), "images_per_s": round(rows / seconds, 3),
                 "partitions": n_partitions}
        if expected is not None:
            stats["check"] = inventory_summary(table, expected)
            stats["flagged"] = stats["check"]["bins_flagged"]
            new.write_text(RECOUNTS, recounts.sheet_text(recount_sheet(table)))
        new.write_text(MARKER, json.dumps({"input": photos.input, "model_uri": model.uri, **stats}, indent=1))
        target.replace(new)
    except BaseException:
        new.delete()
        raise
    return {**stats, "output": target.fs.makeQualified(target.path).toString()}


def inventory_summary(table, expected: Expected) -> dict:
    """The written table -> reconcile.summary over its bins, plus (from a folder or CSV) the expectations
    without a photo (`no_image`, and `bad_metadata` of bins without one), as `bincounter reconcile` counts them."""
    bins = table.select("image_id", "count", "expected_quantity", "flagged", "status").toPandas()
    bins = bins.rename(columns={"count": "predicted"})
    if expected.prefix is None:
        photos = set(bins["image_id"])
        rest = pd.DataFrame(
            [{"image_id": i, "status": "no_image", "flagged": False} for i in expected.quantities if i not in photos]
            + [{"image_id": i, "status": "bad_metadata", "flagged": False} for i in expected.problems if i not in photos],
            columns=["image_id", "status", "flagged"])
        bins = pd.concat([bins, rest], ignore_index=True)
    return rec.summary(bins, expected.threshold)


def recount_sheet(table) -> pd.DataFrame:
    """A score table with the inventory check (a Spark DataFrame) -> its recount sheet (recounts.recount_sheet):
    the flagged bins, riskiest first, `photo` their path or s3:// URI. Flagged bins are few: they are collected
    to the driver."""
    flagged = table.where("flagged").selectExpr("image_id", "source AS path", "expected_quantity",
                                                "`count` AS predicted", "p_expected", "flagged")
    return recounts.recount_sheet(flagged.toPandas())


def output_sheet(spark, output: str) -> pd.DataFrame:
    """A score output written with the inventory check -> its recount sheet, from its table (the sheet the
    output's `recounts.csv` holds)."""
    return recount_sheet(spark.read.parquet(OutputFolder(spark, output).child(TABLE)))
