"""Budget and rate-limit backends: reserve before forwarding, settle after (DESIGN §6)."""
