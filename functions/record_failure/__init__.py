"""Lambda function: record failure."""
