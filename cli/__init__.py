"""The application shell: `paraplan`'s commands. It sits above planner, costmodel, runtime and
reports, parses flags, calls them and prints; none of them imports it."""
