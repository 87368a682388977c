"""Lambda function: process results."""
