"""Testing and demo only: adversarial servers. Nothing in `trustswarm node start` or the
client imports this package; no command-line flag can turn it on."""
