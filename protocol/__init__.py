"""The relay protocol, sans-IO: frames, typed requests and responses, envelopes and receipts.

Nothing here touches a socket, a file or an event loop; the server and the client feed it bytes and
get typed values back, so both ends share one implementation and it is tested without a network.
"""

PROTOCOL_VERSION = 1
