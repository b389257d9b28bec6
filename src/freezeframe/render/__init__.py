"""Render: terminal, images, HTML and notebook views of a Run; none computes."""
