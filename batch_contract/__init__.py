"""The batch contract the daemon, the import workflow's Lambda functions and the status command share.

Key layout and batch ids (``layout``), the manifest schema (``manifest``), timestamps (``timestamps``) and the
workflow table's keys, indexes and status words (``table``), written once. Standard library only, so that every
Lambda zip and the daemon's image carry the same code (docs/s3-layout.rst, docs/import-workflow.rst).
"""
