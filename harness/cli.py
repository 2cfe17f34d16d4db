def main(argv=None):
    raise SystemExit("harness: CLI under construction")
