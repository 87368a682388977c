"""Code shared by the import workflow's Lambda functions; the packaging step copies it into every zip."""
