"""Orchestration: runs the stages of the line. Stages meet only through store rows and artifacts."""
