"""Curation: choose answers for human review, push them to Label Studio, pull the verdicts back, and
export the accepted and corrected answers as a versioned curated dataset."""
