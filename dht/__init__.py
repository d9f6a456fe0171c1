"""The swarm's shared state: signed, schema-validated server records in a hivemind DHT, and lookups over them."""
