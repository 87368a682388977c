"""Lambda function: check import."""
