"""The web dashboard: runs and their curves, starting/stopping runs, a playground, adapters (`loraforge ui`)."""
