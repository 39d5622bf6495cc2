"""Metric definitions, Prometheus rules and the Grafana dashboard; a leaf package anyone may import."""
