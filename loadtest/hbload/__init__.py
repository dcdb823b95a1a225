"""The parts of loadtest/locustfile.py: options, the players' book, the service, checks."""
