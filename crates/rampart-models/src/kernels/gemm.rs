//! A safe, bounds-checked wrapper over the `gemm` crate's f32 matrix product.
#![allow(unsafe_code)]

/// A read-only strided matrix view: element (i, j) is `data[i·row_stride + j·col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    /// Backing storage.
    pub data: &'a [f32],
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Distance between rows.
    pub row_stride: usize,
    /// Distance between columns.
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A contiguous row-major rows×cols matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of this view (no copy).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// `c = a·b` (or `c += a·b` when `accumulate`), c a contiguous row-major m×n buffer.
/// Single-threaded: callers parallelise over independent blocks.
///
/// Panics (a programming error, never user input) if the shapes or buffers disagree.
pub fn sgemm(c: &mut [f32], a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "inner dimensions differ");
    assert_eq!(c.len(), m * n, "output buffer size");
    assert!(a.fits() && b.fits(), "strided view exceeds its buffer");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    // SAFETY: every index the kernel reads, (i·rs + j·cs) for i < rows, j < cols, lies
    // inside `a.data` / `b.data` (checked by `fits`), the output is exactly m×n
    // contiguous, and the three buffers cannot alias (`c` is borrowed mutably).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_product_with_transposes_and_accumulation() {
        let a: Vec<f32> = (0..6).map(|v| v as f32 - 2.0).collect(); // 2×3
        let b: Vec<f32> = (0..12).map(|v| (v as f32) * 0.5).collect(); // 3×4
        let mut c = vec![1.0f32; 8];
        sgemm(
            &mut c,
            MatRef::row_major(&a, 2, 3),
            MatRef::row_major(&b, 3, 4),
            true,
        );
        for i in 0..2 {
            for j in 0..4 {
                let want: f32 = 1.0 + (0..3).map(|p| a[i * 3 + p] * b[p * 4 + j]).sum::<f32>();
                assert!((c[i * 4 + j] - want).abs() < 1e-5);
            }
        }
        // (bᵀ)(aᵀ) = (ab)ᵀ
        let mut ct = vec![0.0f32; 8];
        sgemm(
            &mut ct,
            MatRef::row_major(&b, 3, 4).t(),
            MatRef::row_major(&a, 2, 3).t(),
            false,
        );
        for i in 0..2 {
            for j in 0..4 {
                assert!((ct[j * 2 + i] - (c[i * 4 + j] - 1.0)).abs() < 1e-5);
            }
        }
    }
}
