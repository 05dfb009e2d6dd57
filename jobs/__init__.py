"""sdgen jobs: the Ray batch runner — manifests in, images and provenance out.

Four parts, each with one job (see README.md beside this file):

    reader.py       manifest -> shards (small items with deterministic ids)
    worker.py       one shard -> images + records (model loaded once, bad rows become records)
    writer.py       commits images, then the shard's record file (the completion marker)
    distributor.py  the only module that imports Ray: actors, and an event loop that hands
                    shards to free workers; retry.py's RetryPolicy decides retry or give up

Around them: spec.py (the YAML job spec), manifest.py (Parquet manifests and row checks),
storage.py (local folders and S3 behind one interface), output.py (the output layout, resume
state, record counts), record.py (the typed record and its schema), provenance.py (PNG
parameters, software versions), generation.py (record -> `Pipeline.generate` call, shared with
reproduce), init_images.py (img2img inputs, cached), isolation.py (one bad row never fails its
batch), weights.py (weights cache for s3://), progress.py (a run's outcome and progress lines),
runner.py (`sdgen run`: plan -> execute -> summarise).

Commands: cli.py is the `sdgen` console script (`sdgen run | status | reproduce`); run.py,
status.py and reproduce.py are the same commands as scripts (`python jobs/run.py SPEC` is how
`ray job submit --working-dir .` runs a job).
"""

__version__ = "0.1.0"
