"""BPS: the HTTP door in front of bps.bulk_transfer."""
