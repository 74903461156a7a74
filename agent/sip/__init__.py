"""sip transport."""
