"""Several daemons, one Redis queue: membership, the host registry, events, object fetch, peers."""
