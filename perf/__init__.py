"""perf_analyzer load tests of `flux2_klein_kv`: provisioning, input data, runs and the results table."""
