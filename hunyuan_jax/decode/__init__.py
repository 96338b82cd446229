"""Decoding: the compiled chunked prefill + decode loop (`Generator`) and sampling."""
