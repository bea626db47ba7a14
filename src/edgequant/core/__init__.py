"""The ground floor every other package stands on: the error base and the atomic file writer."""
