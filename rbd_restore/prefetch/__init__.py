"""Prefetch: demand, boot-profile and relocation classes that decide what the fetcher
stages next. Lands with the prefetch issue; the fetcher has a simple sequential
read-ahead until then."""
