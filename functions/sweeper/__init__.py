"""Lambda function: sweeper."""
