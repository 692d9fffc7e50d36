"""What a sweep shows: statistics, figures, the HTML report."""
