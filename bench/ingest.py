"""Ingest throughput: the project's ingest (fresh cache, concurrent, verify + resize + records) against a plain
sequential boto3 loop (get each object, write it to a file), on the same images in one moto S3 server.

The server runs in a process of its own on 127.0.0.1 (as S3 would be elsewhere), so that it does not share the
benchmark's interpreter lock. `--latency_ms` adds a delay to every request the server answers, to model the
time-to-first-byte of real S3 (loopback has none); each latency is one scenario. The CPU seconds spent by the
server (per request) and by this process (per image) are measured too: on 2 cores they show what bounds the
throughput. A threaded download-only loop shows what the server gives concurrent requests.
Images: the first 500 of a seeded pick from ../shared/abid-sample (counts 1..5) if it is there, else generated.
Prints a table per scenario and writes bench/results/ingest.json.

    python bench/ingest.py --images 500 --latency_ms 0,20
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bincounter import abid, synthetic  # noqa: E402
from bincounter.ingest import ingest  # noqa: E402
from bincounter.sources import S3Source, anonymous_client  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "abid-sample"
BUCKET = "bench-abid"


def serve(port: int, latency_ms: float) -> None:
    """Run moto's S3 on 127.0.0.1:port (as ThreadedMotoServer does), each answer delayed by latency_ms."""
    import logging

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    app = DomainDispatcherApplication(create_backend_app)

    def delayed(environ, start_response):
        time.sleep(latency_ms / 1000)  # sleeping releases the GIL: concurrent requests wait in parallel
        return app(environ, start_response)

    make_server("127.0.0.1", port, delayed if latency_ms else app, threaded=True,
                request_handler=MotoRequestHandler).serve_forever()


def start_server(latency_ms: float) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--latency_ms", str(latency_ms)])
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the moto server on port {port} did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pick_images(n: int) -> tuple[dict[str, bytes], dict[str, int], str]:
    """-> ({key: bytes} for the bucket, {image_id: count}, where the images come from)."""
    if (SAMPLE / "labels.csv").exists():
        with open(SAMPLE / "labels.csv", newline="") as f:
            rows = sorted((r for r in csv.DictReader(f) if 1 <= int(r["count"]) <= 5), key=lambda r: r["image_id"])
        rows = random.Random(0).sample(rows, n)
        objects, labels = {}, {}
        for r in rows:
            i = r["image_id"]
            labels[i] = int(r["count"])
            objects[abid.image_key(i)] = (SAMPLE / abid.image_key(i)).read_bytes()
            if (SAMPLE / abid.metadata_key(i)).exists():
                objects[abid.metadata_key(i)] = (SAMPLE / abid.metadata_key(i)).read_bytes()
        return objects, labels, f"{SAMPLE} (real ABID photos)"
    objects, labels = {}, {}
    for k, (i, c) in enumerate(synthetic.synthetic_items(n, 1, 5, seed=0)):
        buf = io.BytesIO()
        synthetic.draw_bin(c, synthetic.item_seed(0, k), 512).save(buf, "JPEG", quality=90)
        objects[abid.image_key(i)], labels[i] = buf.getvalue(), c
    return objects, labels, "generated 512 px bins"


def seed_bucket(endpoint: str, objects: dict[str, bytes]) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                      aws_secret_access_key="bench")
    s3.create_bucket(Bucket=BUCKET)
    s3.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
        "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"]}]}))
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda kv: s3.put_object(Bucket=BUCKET, Key=kv[0], Body=kv[1]), objects.items()))


def timed(method: str, fn, images: int, requests: int, server_pid: int) -> dict:
    s0, c0, t0 = cpu_seconds(server_pid), time.process_time(), time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    server_cpu = cpu_seconds(server_pid) - s0
    return {"method": method, "images": images, "seconds": round(seconds, 3),
            "images_per_s": round(images / seconds, 1), "requests": requests, "server_cpu_s": round(server_cpu, 2),
            "server_cpu_ms_per_request": round(1000 * server_cpu / requests, 2) if requests else None,
            "client_cpu_ms_per_image": round(1000 * (time.process_time() - c0) / images, 2)}


def scenario(latency_ms: float, objects: dict[str, bytes], labels: dict[str, int], downloads: int,
             tmp: Path) -> list[dict]:
    """Both methods (and the rerun, and a threaded download-only loop) against a fresh server -> table rows."""
    server, endpoint = start_server(latency_ms)
    try:
        seed_bucket(endpoint, objects)
        keys = [abid.image_key(i) for i in labels]
        client = anonymous_client(endpoint)

        def download(out: Path, key: str) -> None:
            (out / Path(key).name).write_bytes(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())

        def sequential():
            out = tmp / f"seq-{latency_ms}"
            out.mkdir()
            for key in keys:
                download(out, key)

        def threaded():  # what the server gives many concurrent downloads, with no other work per image
            out = tmp / f"threaded-{latency_ms}"
            out.mkdir()
            with ThreadPoolExecutor(downloads) as ex:
                list(ex.map(lambda key: download(out, key), keys))

        cache = tmp / f"cache-{latency_ms}"

        def project():
            _, rejects, stats = ingest(labels, S3Source(BUCKET, endpoint, downloads), cache, 256, (1, 5),
                                       downloads, progress=False)
            assert stats["ingested"] == len(labels), rejects.head()

        n = len(labels)
        # requests the server answers: one GET per image; ingest also asks for every image's metadata
        rows = [timed("sequential boto3 loop (get + write)", sequential, n, n, server.pid),
                timed(f"project ingest, fresh cache ({downloads} at a time)", project, n, 2 * n, server.pid),
                timed("project ingest, rerun (cache hits)", project, n, 0, server.pid),
                timed(f"threaded boto3 loop (get + write, {downloads} thr)", threaded, n, n, server.pid)]
    finally:
        server.kill()
        server.wait()
    base = rows[0]["images_per_s"]
    for r in rows:
        r["latency_ms"] = latency_ms
        r["vs_sequential"] = round(r["images_per_s"] / base, 2)
    return rows


def main(args) -> None:
    objects, labels, origin = pick_images(args.images)
    n_meta = sum(k.startswith(abid.METADATA_PREFIX) for k in objects)
    print(f"{len(labels)} images from {origin}, {n_meta} with metadata, "
          f"{sum(len(v) for v in objects.values()) / 1e6:.1f} MB; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f} at start")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for latency in args.latency_ms:
            rows = scenario(latency, objects, labels, args.downloads, Path(tmp))
            results += rows
            print(f"\nmoto S3 on 127.0.0.1, {latency:g} ms added per request")
            print(f"{'method':46} {'images':>6} {'seconds':>8} {'images/s':>9} {'x seq':>6} {'requests':>8} "
                  f"{'server ms/req':>13} {'client ms/img':>13}")
            for r in rows:
                per_request = f"{r['server_cpu_ms_per_request']:.2f}" if r["requests"] else "-"
                print(f"{r['method']:46} {r['images']:>6} {r['seconds']:>8.2f} {r['images_per_s']:>9.1f} "
                      f"{r['vs_sequential']:>6.2f} {r['requests']:>8} {per_request:>13} "
                      f"{r['client_cpu_ms_per_image']:>13.2f}")
            print(f"ratio (project ingest, fresh / sequential loop): {rows[1]['vs_sequential']:.2f}x")
    out = ROOT / "bench" / "results" / "ingest.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"images": len(labels), "origin": origin, "with_metadata": n_meta, "cpus": os.cpu_count(),
                               "downloads": args.downloads, "load_average_end": os.getloadavg()[0], "results": results},
                              indent=2) + "\n")
    print(f"\nwrote {out}")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--downloads", type=int, default=16, help="concurrent downloads (the ingest step's default)")
    p.add_argument("--latency_ms", type=lambda v: [float(x) for x in v.split(",")], default=[0.0, 20.0],
                   help="comma-separated: one scenario per added server latency")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # internal: run the server on this port
    return p


if __name__ == "__main__":
    a = get_args_parser().parse_args()
    if a.serve:
        serve(a.serve, a.latency_ms[0])
    else:
        main(a)
