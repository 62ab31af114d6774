"""The benchmark families, installed as attnkit.benchmarks (setup.py's
package_dir). Each family module imports its helpers as siblings
(`from timing import median_ms`); attnkit.bench puts this directory on
sys.path before importing them."""
