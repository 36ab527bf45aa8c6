;;; timing.scm -- time a guix-daemon's small requests with the upstream Guile client.
;;;
;;; guixsvc's own benchmark code, driving the daemon through upstream's (guix store) module,
;;; which is NOT part of this repository: put an upstream Guix tree on Guile's load path (see
;;; run.sh next to this file).  bench/store_ops.py --guile-client=bench/guile runs it as
;;;
;;;   GUIX_DAEMON_SOCKET=SOCKET NIX_STORE_DIR=STORE run.sh timing.scm ITERATIONS TREE RUNS
;;;
;;; and prints one line per row: "NAME RATE" (operations per second, or MB/s of NAR for
;;; add-to-store, over RUNS additions of TREE under distinct names).

(use-modules (guix store)
             (ice-9 format)
             (ice-9 match))

(define (now)
  (/ (exact->inexact (get-internal-real-time)) internal-time-units-per-second))

(define (rate name count thunk)
  (let ((start (now)))
    (thunk)
    (let ((elapsed (- (now) start)))
      (format #t "~a ~,1f~%" name (/ count elapsed))
      (force-output))))

(define tag (number->string (getpid)))

(match (command-line)
  ((_ iterations tree runs)
   (let ((n (string->number iterations))
         (runs (string->number runs)))
     (rate "handshake/s" n
           (lambda ()
             (let loop ((i 0))
               (when (< i n)
                 (close-connection (open-connection))
                 (loop (+ i 1))))))
     (let* ((store (open-connection))
            (paths (make-vector n #f)))
       (rate "add-text-to-store/s" n
             (lambda ()
               (let loop ((i 0))
                 (when (< i n)
                   (vector-set! paths i
                                (add-text-to-store store (string-append "t-" tag)
                                                   (format #f "text ~a ~a" tag i) '()))
                   (loop (+ i 1))))))
       (rate "valid-path?/s" n
             (lambda ()
               (let loop ((i 0))
                 (when (< i n)
                   (valid-path? store (vector-ref paths i))
                   (loop (+ i 1))))))
       (rate "query-path-info/s" n
             (lambda ()
               (let loop ((i 0))
                 (when (< i n)
                   (query-path-info store (vector-ref paths i))
                   (loop (+ i 1))))))
       (let* ((start (now))
              (bytes (let loop ((i 0) (total 0))
                       (if (< i runs)
                           (let ((item (add-to-store store
                                                     (format #f "tree-~a-~a" tag i)
                                                     #t "sha256" tree)))
                             (loop (+ i 1)
                                   (+ total (path-info-nar-size
                                             (query-path-info store item)))))
                           total)))
              (elapsed (- (now) start)))
         (format #t "add-to-store MB/s ~,1f~%" (/ bytes 1e6 elapsed)))
       (close-connection store))))
  (_
   (format (current-error-port) "usage: timing.scm ITERATIONS TREE RUNS~%")
   (exit 2)))
