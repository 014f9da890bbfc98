"""What a Spark job of the project needs around its work: a session on a checked master (`spark_session`,
`check_master`), and an output folder on any filesystem Spark writes (`OutputFolder`: a local path, hdfs://,
s3:// on EMR, dbfs:/), written beside the old one and swapped in whole. The score step (bincounter.score) is
such a job."""
from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import uuid

MARKER = "score.json"  # written last into a score output: what ran and its row counts
MASTER_CONNECT_TIMEOUT = 10  # seconds to reach a spark:// master before giving up (Spark itself waits 70)
MASTER = re.compile(r"local(\[[^\]]+\])?|local-cluster\[[^\]]+\]|spark://[^/]+|yarn|k8s://.+")


def check_master(master: str) -> None:
    """A spark_master Spark would reject, or a spark:// master that does not answer within
    MASTER_CONNECT_TIMEOUT seconds -> ValueError naming it (Spark would take 70 s to say something vaguer)."""
    if not MASTER.fullmatch(master):
        raise ValueError(f"spark_master {master!r}: expected local[*], local[N], spark://host:port, yarn or k8s://...")
    if master.startswith("spark://"):
        errors = []
        for hostport in master[len("spark://"):].split(","):
            host, _, port = hostport.rpartition(":")
            try:
                socket.create_connection((host, int(port)), timeout=MASTER_CONNECT_TIMEOUT).close()
                return
            except (OSError, ValueError) as e:
                errors.append(f"{hostport}: {e}")
        raise ValueError(f"spark_master {master}: cannot reach it ({'; '.join(errors)})")


def spark_session(master: str = "local[*]", batch_size: int = 64, app_name: str = "bincounter-score"):
    """A SparkSession for scoring (an existing one is reused, as under spark-submit or in a notebook): Python
    workers are this interpreter; Arrow batches of `batch_size` rows; one torch thread per task (Spark runs a
    task per core: more threads would fight over the same cores)."""
    check_master(master)
    if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
        raise ValueError("Spark needs a Java runtime: no java on PATH and JAVA_HOME is not set "
                         "(`make java` installs Debian's default-jre-headless)")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # else workers run another python, without pandas
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    builder = (SparkSession.builder.master(master).appName(app_name)
               .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_size))
               .config("spark.sql.execution.arrow.pyspark.enabled", "true")
               .config("spark.executorEnv.OMP_NUM_THREADS", "1")
               .config("spark.ui.showConsoleProgress", "false"))
    try:
        spark = builder.getOrCreate()
    except Exception as e:  # noqa: BLE001 - py4j and Spark errors: the point is to name the master
        raise ValueError(f"spark_master {master}: Spark did not start ({str(e).splitlines()[0]})") from None
    # an existing session keeps its settings; this one is per query
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_size))
    return spark


class OutputFolder:
    """The output folder on any filesystem Spark writes to (a local path, hdfs://, s3:// on EMR, dbfs:/),
    through Hadoop's FileSystem API in the driver's JVM."""

    def __init__(self, spark, uri: str):
        self.uri = uri
        self._Path = spark._jvm.org.apache.hadoop.fs.Path
        self.path = self._Path(uri)
        self.fs = self.path.getFileSystem(spark._jsc.hadoopConfiguration())
        self.fs.setWriteChecksum(False)  # no .crc files beside score.json on a local disk

    def child(self, name: str) -> str:
        return self._Path(self.path, name).toString()

    def check(self) -> None:
        """ValueError when `uri` exists and is not a score output (a rerun may replace only its own output)."""
        if self.fs.exists(self.path) and not self.fs.exists(self._Path(self.path, MARKER)):
            raise ValueError(f"output {self.uri} exists and is not a score output (it has no {MARKER}): "
                             "give a new path or a previous score output")

    def write_text(self, name: str, text: str) -> None:
        stream = self.fs.create(self._Path(self.path, name), True)
        try:
            stream.write(text.encode())
        finally:
            stream.close()

    def replace(self, new: "OutputFolder") -> None:
        """Put the folder `new` where this one is: the old output moves aside, the new one in, the old is
        deleted. A reader sees the old output or the new one, never a mix."""
        aside = self._Path(f"{self.path.toString()}.old-{uuid.uuid4().hex[:8]}")
        had_old = self.fs.exists(self.path)
        if had_old and not self.fs.rename(self.path, aside):
            raise OSError(f"output {self.uri}: cannot move the previous output aside to {aside.toString()}")
        if not self.fs.rename(new.path, self.path):
            if had_old:
                self.fs.rename(aside, self.path)
            raise OSError(f"output {self.uri}: cannot move the new output {new.uri} into place")
        if had_old:
            self.fs.delete(aside, True)

    def delete(self) -> None:
        self.fs.delete(self.path, True)
