"""Job storage: workspaces (local or s3://), job directories, their typed record, remote sync."""
