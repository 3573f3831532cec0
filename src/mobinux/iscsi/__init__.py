"""iSCSI target (RFC 7143): PDU codec, login negotiation, full-feature phase, asyncio adapter."""
