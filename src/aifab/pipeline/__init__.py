"""Pipelines: factory.yaml's stages as a DAG, each stage's body defined once, cached by a key over its inputs,
and run as jobs (aifab.jobs) or in this process (the demo)."""
