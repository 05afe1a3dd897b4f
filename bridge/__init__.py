"""StratumRM Bridge: transparent proxies that carry Stratum V1 over a TLS control
channel and an authenticated UDP share channel.

Layout (imports flow one way: cli -> net/roles -> relay -> sv1, wire, mining -> errors):

- ``bridge.sv1``      Stratum V1, sans-IO: messages, line framing, server and client sessions
- ``bridge.mining``   share math: coinbase, merkle root, header, targets, version rolling
- ``bridge.wire``     StratumRM, sans-IO: control messages, datagrams, keys, delivery
- ``bridge.relay``    sans-IO proxy cores (miner side, pool side)
- ``bridge.net``      thin trio drivers: TCP/TLS/UDP
- ``bridge.pki``      certificate authority, issuing, revocation, TLS contexts
- ``bridge.testing``  reference pool, reference miner, lossy UDP link
"""

__version__ = "0.1.0"
