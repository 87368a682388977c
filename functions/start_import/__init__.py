"""Lambda function: start import."""
