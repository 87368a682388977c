"""StoreDICOM forwarding: every durably stored object also goes to a HealthImaging data store through STOW-RS.

``outbox`` records each stored object before it is acknowledged, in the database ``results`` keeps (each
instance's end state too); ``forwarder`` sends what is due and ``stow`` speaks STOW-RS to HealthImaging;
``recovery`` finds rows a power loss took; ``startup`` wires them; ``local_status`` is the status command's view.
In S3 mode ``s3_batches`` takes the outbox's place: it queues what S3 has confirmed and splits each closing batch by
what StoreDICOM stored.
"""
