"""StoreDICOM forwarding: every durably stored object also goes to a HealthImaging data store through STOW-RS.

The local store is the outbox: ``outbox`` records each stored object before it is acknowledged, ``forwarder``
sends what is due, ``stow`` speaks STOW-RS to HealthImaging, ``results`` keeps each instance's end state.
"""
