"""Lambda function: register a closed batch."""
