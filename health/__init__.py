"""`trustswarm health`: a web page (and JSON, Prometheus metrics) on the swarm's health
and on what the trusted verifiers say about each server."""
