"""Services that turn inventory into boot decisions (between protocols and inventory)."""
