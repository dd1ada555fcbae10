"""Test and demo infrastructure: a local S3 endpoint and sample photos.

Used by ``s3cache demo``, the test suite and the benchmarks; not needed to train.
"""
