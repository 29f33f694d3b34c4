"""What client and server must agree on: parameters, slot layouts, the SEAL wire
format and error reasons. Imports nothing else of heserve but the generated
`heserve.v1` messages, so `heserve_client` needs nothing of the server.
"""
