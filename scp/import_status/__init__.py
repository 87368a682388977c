"""`dicom-store-scp status`: did everything a modality sent reach AWS HealthImaging?

``report`` is what the command says, ``table`` reads the import workflow's DynamoDB table
(docs/import-workflow.rst), ``bucket`` reads the S3 batches the table does not hold yet (docs/s3-layout.rst),
``command`` is the command line that puts them together.
"""
