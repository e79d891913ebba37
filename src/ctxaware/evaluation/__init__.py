"""Step 5: NIH, context-dependent QA / conflict / MT-Bench, the judge, the stage analysis."""
