"""Support for the tests, benchmarks, load tests and the demo: synthetic pictures, metric scraping,
system packages unpacked without root. Nothing here is needed to serve or to call the server."""
