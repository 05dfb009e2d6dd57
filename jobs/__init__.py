"""sdgen jobs: the Ray batch runner — manifests in, images and provenance out.

Four parts, each with one job (see README.md beside this file):

    reader.py       manifest -> shards (small items with deterministic ids)
    worker.py       one shard -> images + records (model loaded once, bad rows become records)
    writer.py       commits images, then the shard's record file (the completion marker)
    distributor.py  the only module that knows about Ray: actors, dynamic hand-out, retries

Around them: spec.py (the YAML job spec), manifest.py (Parquet manifests and row checks),
storage.py (local folders and S3 behind one interface), output.py (the output layout, resume
state), provenance.py (record schema, PNG parameters), weights.py (weights cache for s3://),
runner.py (the `run.py` orchestration). The scripts run.py, status.py, reproduce.py are thin.
"""

__version__ = "0.1.0"
