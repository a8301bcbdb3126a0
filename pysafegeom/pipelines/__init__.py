"""Orchestrators: the pipelines that wire the measurement stages together (analyze, the reopen table, the demo,
the set check). Each stage writes its artifact, so an interrupted run resumes where it stopped."""
