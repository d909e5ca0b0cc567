"""Bad-input corpus generator (tests/corpus/generate.py); files are generated at test time."""
