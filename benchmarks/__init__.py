"""effiseg.benchmarks"""
