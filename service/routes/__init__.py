"""HTTP routes: probes and metrics (open), caption and model info (API key when configured), the web page."""
