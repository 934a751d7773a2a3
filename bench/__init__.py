"""The benchmark of BPS: POST /bulk_transfer measured against PostgreSQL's own floor in the same run."""
