"""The pool-side sidecar's core, sans-IO, one module per concept.

- :mod:`~bridge.relay.sidecar.session`: :class:`SidecarSession`, one proxy's control
  connection (hello, channels, pool events, liveness, errors) and the parts below;
- :mod:`~bridge.relay.sidecar.channels`: one rig's channel and its pool connection,
  the pool commands, what the sidecar refuses to relay;
- :mod:`~bridge.relay.sidecar.jobs`: notify de-duplication (job handles, ``rm.job``,
  ``rm.notify``);
- :mod:`~bridge.relay.sidecar.ledger`: the share ledger (no share reaches the pool twice);
- :mod:`~bridge.relay.sidecar.verdicts`: verdict batching (VERDICT and ACK datagrams,
  ``rm.results``);
- :mod:`~bridge.relay.sidecar.intake`: the shared UDP intake and each session's key epochs.
"""
