"""gRPC: the servicer (messages to domain calls), one interceptor per concern,
tokens and budgets, metrics, and the server that ties them together.
"""
